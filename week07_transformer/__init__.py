"""Week 7: attention and Transformers."""
