"""The paper backbones (NCSN++ for CIFAR-10, ADM for ImageNet-64) and their closed registry.

Every backbone is called as net(x, noise_labels, class_labels=None) with x already scaled by c_in and
noise_labels already c_noise(sigma); it never sees sigma itself. net.shard_units() lists the blocks a
data-parallel backend wraps one by one; net.init_weights() re-initialises a net materialised from `meta`.
"""
from .registry import NETWORKS, NetworkSpec, attention_mismatches, build_network, network_c_noise, network_kwargs

__all__ = ["NETWORKS", "NetworkSpec", "attention_mismatches", "build_network", "network_c_noise", "network_kwargs"]
