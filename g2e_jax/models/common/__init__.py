"""What every backbone shares, so that a backbone's folder adds only what differs: the building blocks
(``layers``), the text decoder (``text``), the config readers and decoder config (``config``), the model
around the decoder (``model``), the checkpoint rule groups (``checkpoint``), the tiny tokenizer
(``hf_files``) and the image processors' arithmetic (``images``)."""
