"""Vision encoders (pure PyTorch, no timm/torchvision): `efficientnet.EfficientNetLite0` and its preprocessing."""
