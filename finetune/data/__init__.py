"""Data: sources (folders, file names, manifests), safe image decoding, transforms, loaders."""
