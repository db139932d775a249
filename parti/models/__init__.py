"""Model code: shared Transformer layers, ViT-VQGAN, quantizer, discriminator, Parti."""
