"""Per-method defaults of the CaSSLe / Branch-tuning CIFAR-100 recipes.

Every number below is the value the continual-SSL baselines were run with on CIFAR-100
(ResNet-18 with a CIFAR stem, batch 256, 500 epochs per task, warmup-cosine schedule), so that a
run with :data:`RECIPES` reproduces the setting of the tables in the Branch-tuning paper
(Liu, Zhu, Liu, arXiv 2403.18266) and CaSSLe (Fini et al., CVPR 2022). Sources, in order of
precedence:

1. CaSSLe's CIFAR-100 scripts, ``bash_files/continual/cifar/<method>_distill.sh`` in
   github.com/DonkeyShot21/cassle (the Branch-tuning authors built on that code base);
2. the method defaults of CaSSLe's ``cassle/methods/<method>.py`` and
   ``cassle/distillers/*.py`` where a script does not set a value;
3. solo-learn's CIFAR configs, ``scripts/pretrain/cifar/<method>.yaml`` and
   ``scripts/pretrain/cifar/augmentations/*.yaml`` in github.com/vturrisi/solo-learn, for
   MoCo v2+, for which CaSSLe ships no CIFAR script.

The ``Recipe`` docstring cites the source of each method's values field by field.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Recipe", "RECIPES"]


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of one SSL method on CIFAR: optimiser, heads, loss, augmentations, CaSSLe.

    A field that does not apply to a method is ``None``.

    Optimiser (the trainer's business; here so one object carries a method's whole recipe):
        lr: base learning rate for batch 256.
        weight_decay: weight decay.
        optimizer: ``"lars"`` (SGD + LARS, eta 0.02, LR clipping, as in every CaSSLe CIFAR
            script; all but SwAV's also exclude biases and norms from LARS) or ``"sgd"`` (plain
            SGD with momentum 0.9: solo-learn's CIFAR MoCo v2+ config).
        batch_size: the batch size ``lr`` belongs to.

    Heads (see :mod:`timm_branch.ssl.heads`):
        proj_hidden_dim, proj_output_dim: projector widths.
        proj_layers: number of Linear layers of the projector (2, or 3 for Barlow Twins and
            VICReg).
        proj_bn: whether the projector's hidden layers have BatchNorm1d (not for SimCLR and
            MoCo v2+, whose CaSSLe projectors are ``Linear -> ReLU -> Linear``).
        pred_hidden_dim: hidden width of the BYOL predictor; ``None`` if the method has none.

    Loss:
        temperature: softmax temperature (SimCLR, MoCo v2+, SwAV).
        base_momentum, final_momentum: start and end of the cosine EMA schedule of the momentum
            encoder (:func:`timm_branch.ssl.momentum.cosine_momentum`); ``None`` without one.
        queue_size: MoCo's negative-key queue, or SwAV's feature queue for the assignments.
        num_prototypes, sk_epsilon, sk_iters: SwAV prototypes and Sinkhorn-Knopp settings.
        epoch_queue_starts: SwAV uses its queue from this epoch of each task on.
        freeze_prototypes_epochs: SwAV does not train its prototypes in the first epochs of a task.
        lamb: Barlow Twins' weight of the off-diagonal (redundancy-reduction) terms.
        scale_loss: Barlow Twins' overall scale of the loss (solo-learn's ``scale_loss``).
        sim_weight, var_weight, cov_weight: VICReg's invariance / variance / covariance weights.

    Augmentations, per view (``(view 1, view 2)`` tuples where the views differ):
        crop_size: output side of the random resized crop.
        crop_min_scale: lower bound of the crop's area fraction (upper bound 1.0).
        jitter: colour-jitter strengths ``(brightness, contrast, saturation, hue)``.
        jitter_p: probability of applying the colour jitter.
        gray_p: probability of greyscale.
        solarize_p: probability of solarisation, per view.
        blur_p: probability of Gaussian blur, per view (none on CIFAR).
        flip_p: probability of a horizontal flip.

    CaSSLe (:mod:`timm_branch.ssl.cassle`):
        distill_temperature: temperature of the contrastive (SimCLR, MoCo) or knowledge (SwAV)
            distiller; ``None`` for the others.
        distill_weight: weight of the distillation loss in ``ssl + weight * distill``: 1.0,
            except VICReg's 25.0 (the default ``distill_lamb`` of CaSSLe's ``predictive_mse``
            distiller, which the VICReg CIFAR script does not override).

    Values by method (``[C]`` CaSSLe CIFAR script, ``[Cd]`` a CaSSLe method/distiller default,
    ``[S]`` solo-learn CIFAR config):

    - ``simclr``: lr 0.4, wd 1e-5, LARS [C]; projector 2048 -> 256, no BN [C, Cd];
      temperature 0.2 [C]; jitter 0.8/0.8/0.8/0.2, no solarisation, no blur [C];
      distill temperature 0.2 [Cd].
    - ``byol``: lr 1.0, wd 1e-5, LARS [C]; projector 4096 -> 256 and predictor 4096, with BN
      [C, Cd]; EMA 0.99 -> 1.0 [C, S]; jitter 0.4/0.4/0.2/0.1, solarisation (0.0, 0.2) [C].
    - ``barlow``: lr 0.3, wd 1e-4, LARS [C]; 3-layer projector 2048 -> 2048 with BN [Cd];
      lamb 5e-3 [Cd], scale_loss 0.1 [C, S]; jitter 0.4/0.4/0.2/0.1, solarisation (0.0, 0.2) [C].
    - ``moco`` (MoCo v2+): lr 0.3, wd 1e-4, plain SGD [S]; projector 2048 -> 256, no BN [S, Cd];
      temperature 0.2, queue 65536 (CaSSLe's value; solo-learn's CIFAR config has 32768),
      EMA 0.99 -> 0.999 [S, CaSSLe ImageNet-100 script]; jitter 0.4/0.4/0.4/0.1 (solo-learn's
      ``symmetric_weak``), no solarisation [S]; no blur (CaSSLe's CIFAR rule; solo-learn has
      0.5); distill temperature 0.2 [Cd].
    - ``vicreg``: lr 0.3, wd 1e-4, LARS [C]; 3-layer projector 2048 -> 2048 with BN [Cd];
      weights 25 / 25 / 1 [C]; crop min scale 0.2, jitter 0.4/0.4/0.2/0.1, solarisation 0.1 on
      both views [C, S]; distill weight 25 [Cd].
    - ``swav``: lr 0.6, wd 1e-6, LARS [C]; projector 2048 -> 128 with BN, 3000 prototypes,
      queue 3840 from epoch 50, prototypes frozen for 2 epochs [C]; temperature 0.1,
      Sinkhorn epsilon 0.05 and 3 iterations [Cd]; jitter 0.8/0.8/0.8/0.2, no solarisation,
      no blur [C]; distill temperature 0.1 [Cd].

    All methods: crop 32, crop min scale 0.08 (VICReg 0.2) [C, S], jitter p 0.8, greyscale p 0.2,
    flip p 0.5 [S augmentation configs].
    """

    lr: float
    weight_decay: float
    proj_hidden_dim: int
    proj_output_dim: int
    optimizer: str = "lars"
    batch_size: int = 256
    proj_layers: int = 2
    proj_bn: bool = True
    pred_hidden_dim: int | None = None
    temperature: float | None = None
    base_momentum: float | None = None
    final_momentum: float | None = None
    queue_size: int | None = None
    num_prototypes: int | None = None
    sk_epsilon: float | None = None
    sk_iters: int | None = None
    epoch_queue_starts: int | None = None
    freeze_prototypes_epochs: int | None = None
    lamb: float | None = None
    scale_loss: float | None = None
    sim_weight: float | None = None
    var_weight: float | None = None
    cov_weight: float | None = None
    crop_size: int = 32
    crop_min_scale: float = 0.08
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    solarize_p: tuple[float, float] = (0.0, 0.0)
    blur_p: tuple[float, float] = (0.0, 0.0)
    flip_p: float = 0.5
    distill_temperature: float | None = None
    distill_weight: float = 1.0


_STRONG_JITTER = (0.8, 0.8, 0.8, 0.2)

RECIPES: dict[str, Recipe] = {
    "simclr": Recipe(
        lr=0.4, weight_decay=1e-5, proj_hidden_dim=2048, proj_output_dim=256, proj_bn=False,
        temperature=0.2, jitter=_STRONG_JITTER, distill_temperature=0.2,
    ),
    "byol": Recipe(
        lr=1.0, weight_decay=1e-5, proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096,
        base_momentum=0.99, final_momentum=1.0, solarize_p=(0.0, 0.2),
    ),
    "barlow": Recipe(
        lr=0.3, weight_decay=1e-4, proj_hidden_dim=2048, proj_output_dim=2048, proj_layers=3,
        lamb=5e-3, scale_loss=0.1, solarize_p=(0.0, 0.2),
    ),
    "moco": Recipe(
        lr=0.3, weight_decay=1e-4, optimizer="sgd", proj_hidden_dim=2048, proj_output_dim=256,
        proj_bn=False, temperature=0.2, base_momentum=0.99, final_momentum=0.999, queue_size=65536,
        jitter=(0.4, 0.4, 0.4, 0.1), distill_temperature=0.2,
    ),
    "vicreg": Recipe(
        lr=0.3, weight_decay=1e-4, proj_hidden_dim=2048, proj_output_dim=2048, proj_layers=3,
        sim_weight=25.0, var_weight=25.0, cov_weight=1.0, crop_min_scale=0.2, solarize_p=(0.1, 0.1),
        distill_weight=25.0,
    ),
    "swav": Recipe(
        lr=0.6, weight_decay=1e-6, proj_hidden_dim=2048, proj_output_dim=128, temperature=0.1,
        queue_size=3840, num_prototypes=3000, sk_epsilon=0.05, sk_iters=3, epoch_queue_starts=50,
        freeze_prototypes_epochs=2, jitter=_STRONG_JITTER, distill_temperature=0.1,
    ),
}
