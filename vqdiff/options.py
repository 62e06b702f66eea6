"""The closed option sets of the config, as enums: the config checks a YAML value against them when it loads
(a typo stops there, naming the key and the allowed values), and the code and the CLI's choices use the same
classes. The bottom layer beside config.py: it imports nothing of vqdiff."""

import enum


class Option(str, enum.Enum):
    """A str enum whose f-string is its value (as the YAML writes it), not `Class.MEMBER`."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


# ---- data ----

class DataName(Option):
    SHAPES = "shapes"              # generated coloured shapes with captions (data/shapes.py)
    TOY2D = "toy2d"                # 2-D points (data.toy)
    CIFAR10 = "cifar10"            # data.root: the python pickles
    MNIST = "mnist"                # data.root: the idx files
    IMAGE_FOLDER = "image_folder"  # data.root: any images, no captions
    CAPTIONS = "captions"          # data.root: metadata.jsonl or image + same-name .txt files
    COCO = "coco"                  # data.root: annotations/captions_<split>2017.json and <split>2017/


class Toy2D(Option):
    SCURVE = "scurve"
    SWISSROLL = "swissroll"
    MOONS = "moons"


# ---- Gaussian diffusion ----

class MeanType(Option):
    EPSILON = "epsilon"        # the noise (Ho et al. 2020)
    START_X = "start_x"        # x_0
    PREVIOUS_X = "previous_x"  # the posterior mean of x_{t-1}
    VELOCITY = "velocity"      # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)


class VarType(Option):
    FIXED_LARGE = "fixed_large"      # beta_t (with the posterior variance at t = 0 for a finite log)
    FIXED_SMALL = "fixed_small"      # the posterior variance beta_tilde_t
    LEARNED = "learned"              # the network outputs log sigma^2
    LEARNED_RANGE = "learned_range"  # the network outputs v in [-1, 1] between the two (N&D eq. 15)


class LossType(Option):
    MSE = "mse"                    # L_simple; + L_vlb term with a learned variance (weight 1)
    RESCALED_MSE = "rescaled_mse"  # as MSE with the vb term scaled by T / 1000 (improved-diffusion)
    KL = "kl"                      # the variational bound L_vlb alone
    RESCALED_KL = "rescaled_kl"    # L_vlb scaled by T / 1000
    HYBRID = "hybrid"              # L_simple + lambda * L_vlb (N&D eq. 16), stop-gradient on the mean


class Sampler(Option):
    DDPM = "ddpm"  # ancestral sampling from p(x_{t-1} | x_t)
    DDIM = "ddim"  # Song et al. 2021 eq. 12; eta = 0 deterministic, eta = 1 the DDPM posterior


class BetaSchedule(Option):
    LINEAR = "linear"
    COSINE = "cosine"
    QUADRATIC = "quadratic"
    SIGMOID = "sigmoid"


class TimeSampler(Option):
    UNIFORM = "uniform"        # t uniform over the steps
    IMPORTANCE = "importance"  # t in proportion to sqrt(E[L_t^2]) (Nichol & Dhariwal 2021)


# ---- discrete diffusion ----

class DiscreteSchedule(Option):
    RELEASED = "released"    # the released VQ-Diffusion schedule: almost pure masking
    PAPER = "paper"          # the paper's: real uniform replacement (K beta_bar ~0.1)
    ABSORBING = "absorbing"  # masking only, no replacement


class SamplingStrategy(Option):
    ANCESTRAL = "ancestral"  # x_s ~ sum_x0 q(x_s | x_t, x0) p(x0 | x_t)
    PURITY = "purity"  # reveal a fixed count of masked tokens per step, purest first (Tang et al. 2022)


# ---- networks ----

class TimeEmbedding(Option):
    TABLE = "table"            # learned row per step (released VQ-Diffusion models)
    SINUSOIDAL = "sinusoidal"  # fixed sinusoid of t rescaled to [0, 4000), like the official "*_abs" variant


class Activation(Option):
    GELU = "gelu"              # erf GELU (Hendrycks & Gimpel 2016)
    QUICK_GELU = "quick_gelu"  # x * sigmoid(1.702 x): the released models' "GELU2"


class TransformerPreset(Option):
    S = "S"
    B = "B"
    F = "F"  # B pre-trained on CC and fine-tuned: the same network
    L = "L"  # Improved VQ-Diffusion (ITHQ)


class TextBackend(Option):
    OPEN_CLIP = "open_clip"
    HF = "hf"


# ---- tokenizer training ----

class TemperatureDecay(Option):
    CONSTANT = "constant"
    LINEAR = "linear"
    EXPONENTIAL = "exponential"
    COSINE = "cosine"


class ReconLoss(Option):
    L1 = "l1"
    L2 = "l2"
