"""The core of the defence: configuration, the ImageNet->CIFAR-10 mapping, the stream models,
decoding, the comparator (Algorithm 1), the reputation rules (Algorithm 2) and the one scoring
path every caller shares, and the stateful query detector (``query_detector``). Pure
PyTorch/NumPy: no Ray, no I/O beyond weights and the mapping."""
