"""parti: train and sample Parti-style text-to-image models (ViT-VQGAN + encoder-decoder)."""

__version__ = "0.1.0"
