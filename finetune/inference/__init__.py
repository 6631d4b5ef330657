"""Inference: checkpoints back into models, batched and streamed prediction, TTA, Grad-CAM, export."""
