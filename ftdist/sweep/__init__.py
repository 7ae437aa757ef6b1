"""`ftdist tune`: the search space and trial jobs (space), Ray Tune wiring (tune), results (report)."""
