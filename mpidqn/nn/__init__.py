"""Q-networks as ordered layer lists (MLP, CNNs, the registry by network.kind) and the numpy actor."""
