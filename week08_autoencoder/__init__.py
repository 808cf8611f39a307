"""Week 8: PCA, k-means and autoencoders."""
