"""The steps of SODA's Algorithm 1, one module each (teacher, snapshot, pairs, warmup, distill), and GAD's stages."""
