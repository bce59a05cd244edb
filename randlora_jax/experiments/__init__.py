"""Experiment protocols: fine-tuning studies a user can run as they are, which the benchmark
drivers in ``bench/`` call and tabulate.

* `ablation`: the pieces every fidelity study shares: the tied-gamma rank ablation, the
  numerical rank of a learned update, loading a backbone into a fresh model's parameters,
  and picking a learning rate on the validation split.
* `real_transfer`: a small ViT pretrained on Fashion-MNIST, fine-tuned on scikit-learn's
  digits by each method at matched budgets, k-shot and full.
* `synthetic_fidelity`: a frozen random MLP and a teacher with a full-rank change; each
  method's student at an equal budget.
* `trainer_arms`: the same arms trained by the trainer itself (`train.loop.train`), the
  tied-gamma ablation as the trainer's optimizer.
* `perturb`: a RandLoRA adapter that is not a no-op without training (random lambda/gamma),
  for checking merges and quantised bases.

Nothing in the package imports these modules; they import the layers below them (models,
data, methods, optim, adapter; `trainer_arms` the trainer).
"""
