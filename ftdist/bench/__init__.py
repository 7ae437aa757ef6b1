"""`ftdist bench`: ftdist against the bare libraries, side by side; self-contained (its own task and job specs)."""
