"""Training data: grounded record formats, synthetic shape scenes, fine-tuning."""
