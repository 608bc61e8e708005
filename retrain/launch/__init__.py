"""Ways to start ``retrain.job``: a local subprocess (local), torchrun for several GPUs (ddp),
or a Kubernetes Job (kubernetes). Each returns a handle with ``poll()`` and ``terminate()``
(the contract is base.py); choose.py picks one per ``retrain.launcher`` for the daemon."""
