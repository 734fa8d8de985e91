"""Hypernetworks (A1111 package name): residual MLPs on the K/V context of every attention layer."""
