"""Host-side (numpy + PIL) data preparation, kept off the accelerator."""
