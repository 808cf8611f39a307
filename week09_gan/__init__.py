"""Week 9: generative adversarial networks, from the minimax game in numbers to a DCGAN."""
