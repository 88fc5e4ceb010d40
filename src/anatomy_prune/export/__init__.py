"""Export stage: a (pruned) model as an ONNX graph that ONNX Runtime runs without this package."""
