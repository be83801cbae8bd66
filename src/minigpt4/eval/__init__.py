"""Evaluation: the standard captioning, VQA and hallucination metrics (`metrics`) and the task readers
behind `minigpt4 eval` (`tasks`)."""
