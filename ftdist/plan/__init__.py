"""`ftdist plan`: what a job needs before it runs (memory per GPU and per node, speed, GPU-hours and money, for the
job and its sweep), from the model's config.json and the job file alone. No torch, no weights, no GPU."""
