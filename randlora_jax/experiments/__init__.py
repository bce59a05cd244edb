"""Experiment protocols: fine-tuning studies a user can run as they are, which the benchmark
drivers in ``bench/`` call and tabulate.

* `ablation`: the pieces every fidelity study shares: the tied-gamma rank ablation, the
  numerical rank of a learned update, loading a backbone into a fresh model's parameters,
  and picking a learning rate on the validation split.
* `real_transfer`: a small ViT pretrained on Fashion-MNIST, fine-tuned on scikit-learn's
  digits by each method at matched budgets, k-shot and full.
* `synthetic_fidelity`: a frozen random MLP and a teacher with a full-rank change; each
  method's student at an equal budget.

Modules import from the package's lower layers only (models, data, methods, optim, adapter).
"""
