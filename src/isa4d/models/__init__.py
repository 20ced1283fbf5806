"""Networks of isa4d: the causal video VAE (stage 1) and the ISA-DiT (stage 2)."""
