"""Training of the low-resolution stream (``twostream train-low``).

* :mod:`.options`: :class:`~.options.TrainOptions`, everything that determines a run;
* :mod:`.data`: a labelled ImageFolder named by CIFAR-10 class, decoded once and brought to the
  stream's input through the stream's own resize; the held-out split; augmentation;
* :mod:`.adversarial`: the training and evaluation perturbations (FGSM with random start, PGD-k),
  L-inf in [0, 1] pixel space at the stream's input size;
* :mod:`.loop`: the seeded training loop with checkpoints and resume, and the weight file with
  its metadata.
"""
