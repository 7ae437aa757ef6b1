"""What a run tells the user while and after it runs: tracking (MLflow, TensorBoard, W&B), the run report, progress.
The driver-side modules import neither torch nor DeepSpeed."""
