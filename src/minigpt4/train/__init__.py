"""Two-stage MiniGPT-4 training: schedule, optimizer, checkpoints, distributed setup and the loop."""
