"""condgen.training: load labelled data, fine-tune a causal LM on `intent,text` lines, export to ONNX."""
