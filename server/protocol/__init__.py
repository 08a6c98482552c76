"""Triton's GRPCInferenceService over the stubs tritonclient ships: servicer, tensors, types."""
