"""Running a job: the driver (Ray Train), the worker loop and what it is built from (data, model, optimiser,
DeepSpeed config, checkpoints), and the export of the result."""
