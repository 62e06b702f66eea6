"""Mask-and-replace multinomial diffusion of VQ-Diffusion (Gu et al. 2022) on token ids.

Tokens are 0..K-1 and [MASK] = K; distributions are log-probabilities `[B, K+1, N]` with [MASK] last.
Time follows the released code: t in {0..T-1}, x_t at t = 0 has already had one noising step, and
"s = -1" means x_0 itself (the cumulative tables get an identity entry there). One step keeps a content
token with alpha_t + beta_t, turns it into each class with beta_t and into [MASK] with gamma_t (eq. 4).

Every reverse distribution used here is sum_x0 q(x_s | x_t, x0) p(x0 | x_t) for some p over the K
classes. For one x_t token it is always the mixture

    model * p  +  (uniform / K) * 1_K  +  keep * onehot(x_t)  +  mask * onehot([MASK])

with four per-token weights (`PosteriorMixture`) that depend on p only through p(x0 = x_t). The
posterior, its KL for training and the samplers are all built on it, so no (K+1)x(K+1) matrix and no
more than O(B K N) work is ever needed, for any s < t (exact skip steps).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .discrete_sampling import SamplingOptions, SamplingStrategy, check_logits, sample_iter
from .losses import LOG_EPS, stable_softmax
from .schedules import MaskAndReplaceSchedule, mask_and_replace_preset

LOG_ZERO = -1e4  # finite stand-in for log 0 inside sums, so that 0 * log 0 stays 0 and gradients stay finite
SUM_LOG_FLOOR = 1e-30  # floor of a p + b in S; S only counts where b > 0, and there a p + b >= b


@dataclass
class PosteriorMixture:
    """Per-token weights `[B, N]` (float64) of the reverse distribution; they sum to 1."""
    model: torch.Tensor    # draw x_s from p(x0 | x_t)
    uniform: torch.Tensor  # draw x_s uniformly from the K content classes
    keep: torch.Tensor     # x_s = x_t (content x_t only)
    mask: torch.Tensor     # x_s = [MASK] (x_t = [MASK] only)


class MaskAndReplaceDiffusion:
    """Forward process, exact posteriors, training losses, VLB and samplers of VQ-Diffusion.

    schedule: a preset name of `schedules.MASK_AND_REPLACE_PRESETS` or a `MaskAndReplaceSchedule`.
    mask_weight: (weight of tokens masked in x_t, weight of the others) on the per-token losses.
    The trainer draws t from its own time sampler (build.build_time_sampler; VQ-Diffusion's importance sampler
    is updated with the unweighted per-sample `losses["kl"]`).
    """

    def __init__(self, num_classes: int, num_timesteps: int = 100,
                 schedule: "MaskAndReplaceSchedule | str" = "released", aux_weight: float = 5e-4,
                 adaptive_aux_weight: bool = True, mask_weight: tuple[float, float] = (1.0, 1.0)):
        if isinstance(schedule, str):
            schedule = mask_and_replace_preset(schedule, num_timesteps, num_classes)
        if schedule.num_timesteps != num_timesteps or schedule.num_classes != num_classes:
            raise ValueError(f"schedule is for T={schedule.num_timesteps}, K={schedule.num_classes}; the "
                             f"diffusion has T={num_timesteps}, K={num_classes}")
        self.num_classes = num_classes
        self.num_timesteps = num_timesteps
        self.mask_id = num_classes
        self.schedule = schedule
        self.aux_weight = aux_weight
        self.adaptive_aux_weight = adaptive_aux_weight
        self.mask_weight = tuple(mask_weight)
        identity = {"alpha_bar": 1.0, "beta_bar": 0.0, "gamma_bar": 0.0}
        self._tables = {name: torch.cat([torch.tensor([first], dtype=torch.float64), getattr(schedule, name)])
                        for name, first in identity.items()}  # index t + 1, so that t = -1 is x_0
        self._steps = {name: getattr(schedule, name) for name in ("alpha", "beta", "gamma")}
        self._device_tables = {}

    # ---- tables ----------------------------------------------------------------------------------

    def _table(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Cumulative table `name` at t (t = -1 allowed), float64 `[B, 1]` on t's device."""
        key = (name, t.device)
        if key not in self._device_tables:
            self._device_tables[key] = self._tables[name].to(t.device)
        return self._device_tables[key][t + 1].unsqueeze(1)

    def _check_t(self, t: torch.Tensor, batch_size: int, low: int = 0) -> None:
        if t.ndim != 1 or t.shape[0] != batch_size or t.dtype != torch.long:
            raise ValueError(f"timesteps must be a LongTensor of shape [{batch_size}], got {t.dtype} "
                             f"{tuple(t.shape)}")
        if t.numel() and (int(t.min()) < low or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [{low}, {self.num_timesteps - 1}], got "
                             f"[{int(t.min())}, {int(t.max())}]")

    def _check_tokens(self, x: torch.Tensor, name: str, allow_mask: bool) -> None:
        top = self.num_classes + (1 if allow_mask else 0)
        if x.ndim != 2 or x.dtype != torch.long:
            raise ValueError(f"{name} must be a LongTensor of token ids [B, N], got {x.dtype} {tuple(x.shape)}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= top):
            raise ValueError(f"{name} ids must lie in [0, {top - 1}], got [{int(x.min())}, {int(x.max())}]")

    def _resolve_s(self, t: torch.Tensor, s) -> torch.Tensor:
        if s is None:
            return t - 1
        s = torch.as_tensor(s, dtype=torch.long, device=t.device).expand_as(t)
        if bool(((s < -1) | (s >= t)).any()):
            raise ValueError("the earlier time s must satisfy -1 <= s < t for every sample")
        return s

    # ---- forward process -------------------------------------------------------------------------

    def q_probs(self, log_x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log q(x_t | x_0) `[B, K+1, N]` for a one-hot or soft (log) x_0 `[B, K+1, N]` (eq. 5)."""
        self._check_t(t, log_x0.shape[0], low=-1)
        return self._forward(log_x0, self._table("alpha_bar", t), self._table("beta_bar", t),
                             self._table("gamma_bar", t))

    def q_step_probs(self, log_x_prev: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log q(x_t | x_{t-1}) `[B, K+1, N]`: one step (eq. 4); at t = 0 the step from x_0."""
        self._check_t(t, log_x_prev.shape[0])
        alpha, beta, gamma = (self._steps[n].to(t.device)[t].unsqueeze(1) for n in ("alpha", "beta", "gamma"))
        return self._forward(log_x_prev, alpha, beta, gamma)

    def _forward(self, log_x, alpha, beta, gamma) -> torch.Tensor:
        """Apply a mask-and-replace transition (weights `[B, 1]`) to log-distributions `[B, K+1, N]`."""
        K = self.num_classes
        if log_x.ndim != 3 or log_x.shape[1] != K + 1:
            raise ValueError(f"expected log-probabilities [B, {K + 1}, N], got {tuple(log_x.shape)}")
        content, masked = log_x[:, :K], log_x[:, K:]
        log_content_mass = torch.logsumexp(content, dim=1, keepdim=True)  # [B, 1, N]
        a, b, g = (_log(w, log_x.dtype).unsqueeze(2) for w in (alpha, beta, gamma))
        out_content = torch.logaddexp(content + a, b + log_content_mass)
        out_mask = torch.logaddexp(masked, g + log_content_mass)
        return torch.cat([out_content, out_mask], dim=1).clamp_min(LOG_EPS)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) for token ids `[B, N]`; O(B N), no class dimension."""
        self._check_tokens(x0, "x0", allow_mask=False)
        self._check_t(t, x0.shape[0])
        u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
        gamma_bar = self._table("gamma_bar", t)
        replaced = u < gamma_bar + self.num_classes * self._table("beta_bar", t)
        # replacement draws uniformly from all K classes, the original one included (weight beta_bar)
        random = torch.randint(self.num_classes, x0.shape, generator=generator, device=x0.device)
        xt = torch.where(replaced, random, x0)
        return xt.masked_fill(u < gamma_bar, self.mask_id)

    # ---- the reverse mixture ---------------------------------------------------------------------

    def posterior_mixture(self, xt: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                          p_xt: torch.Tensor) -> PosteriorMixture:
        """Weights of sum_x0 q(x_s | x_t, x0) p(x0) for -1 <= s < t, given p(x0 = x_t) `[B, N]`.

        Bayes: q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0), where the (t - s)-step
        transition is mask-and-replace with A = alpha_bar_t / alpha_bar_s, G = (gamma_bar_t - gamma_bar_s) /
        (1 - gamma_bar_s) and B from beta_bar_t = A beta_bar_s + B (alpha_bar_s + K beta_bar_s).
        x_t = [MASK]: q(x_t | x0) = gamma_bar_t for every x0, so the mixture is G q(x_s | x0 ~ p) /
        gamma_bar_t on content and gamma_bar_s / gamma_bar_t on [MASK]. x_t = k: q(x_t | x0) is
        alpha_bar_t + beta_bar_t at x0 = k and beta_bar_t elsewhere; the ratios B / beta_bar_t and
        beta_bar_s / beta_bar_t are taken as 0 where beta_bar_t = 0 (absorbing: x_t = k means x0 = k).
        """
        K = self.num_classes
        at, bt, gt = (self._table(n, t) for n in ("alpha_bar", "beta_bar", "gamma_bar"))
        a_s, bs, gs = (self._table(n, s) for n in ("alpha_bar", "beta_bar", "gamma_bar"))
        A = _safe_div(at, a_s)
        G = _safe_div(gt - gs, 1 - gs)  # = 1 - (1 - gamma_bar_t) / (1 - gamma_bar_s), without cancellation
        B = _safe_div(bt - A * bs, a_s + K * bs).clamp_min(0)
        p = p_xt.double()
        is_mask = xt == self.mask_id
        zero = torch.zeros_like(p)
        # x_t = [MASK] (where gamma_bar_t = 0 it cannot happen; draw from p then, so no [MASK] survives)
        mask_model = torch.where(gt > 0, _safe_div(G * a_s, gt), 1.0)
        # x_t = k: unnormalised U_i = rho1 alpha_bar_s p_i + c for i != k, u_k at k, 0 at [MASK]
        rho1, rho2 = _safe_div(B, bt), _safe_div(bs, bt)
        w_k = _safe_div(p, at + bt)  # p(x0 = k) / q(x_t = k | x0 = k)
        c = B * (rho2 * (1 - p) + bs * w_k)
        u_k = (A + B) * ((a_s + bs) * w_k + rho2 * (1 - p))
        total = rho1 * a_s * (1 - p) + (K - 1) * c + u_k
        possible = total > 0  # else x_t = k cannot happen under the schedule: keep it
        total = torch.where(possible, total, 1.0)
        content_model = torch.where(possible, rho1 * a_s / total, 0.0)
        content_keep = torch.where(possible, (u_k - rho1 * a_s * p - c) / total, 1.0).clamp_min(0)
        return PosteriorMixture(
            model=torch.where(is_mask, mask_model, content_model),
            uniform=torch.where(is_mask, _safe_div(G * K * bs, gt), K * c / total),
            keep=torch.where(is_mask, zero, content_keep),
            mask=torch.where(is_mask, _safe_div(gs, gt), zero))

    def q_posterior(self, log_x0: torch.Tensor, log_xt: torch.Tensor, t: torch.Tensor, s=None) -> torch.Tensor:
        """log q(x_s | x_t, x_0) `[B, K+1, N]` for -1 <= s < t (default s = t - 1; s = -1 is x_0).

        log_xt: log one-hot x_t. log_x0: log one-hot or soft x_0 over K+1 (its [MASK] entry is ignored,
        the content entries renormalised); a soft x_0 gives exactly sum_x0 q(x_s | x_t, x0) p(x0).
        """
        self._check_t(t, log_xt.shape[0])
        return self._posterior_log_probs(F.log_softmax(log_x0[:, : self.num_classes], dim=1),
                                         log_xt.argmax(dim=1), t, self._resolve_s(t, s))

    def _posterior_log_probs(self, log_p0: torch.Tensor, xt: torch.Tensor, t, s) -> torch.Tensor:
        """Materialise the mixture: log-probabilities `[B, K+1, N]` from log p(x0) `[B, K, N]`."""
        k = xt.clamp(max=self.num_classes - 1).unsqueeze(1)  # [B, 1, N]
        mix = self.posterior_mixture(xt, t, s, log_p0.gather(1, k).squeeze(1).exp())
        dtype = log_p0.dtype
        log_model, log_keep, log_mask = (_log(w, dtype).unsqueeze(1) for w in (mix.model, mix.keep, mix.mask))
        log_uniform = _log(mix.uniform / self.num_classes, dtype).unsqueeze(1)
        content = torch.logaddexp(log_model + log_p0, log_uniform)  # [B, K, N]
        content = content.scatter(1, k, torch.logaddexp(content.gather(1, k), log_keep))
        return torch.cat([content, log_mask], dim=1).clamp(LOG_EPS, 0.0)

    # ---- the network -----------------------------------------------------------------------------

    def model_logits(self, model, xt: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The network's logits `[B, K, N]` over the content classes, checked."""
        logits = model(xt, t, **cond)
        check_logits(logits, xt.shape[0], self.num_classes, xt.shape[1])
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def p_log_x0(self, model, xt: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """log p_theta(x_0 | x_t) `[B, K+1, N]`; the [MASK] entry is LOG_EPS (log 0)."""
        log_p0 = F.log_softmax(self.model_logits(model, xt, t, **cond), dim=1)
        return F.pad(log_p0, (0, 0, 0, 1), value=LOG_EPS).clamp_min(LOG_EPS)

    def p_prev(self, model, xt: torch.Tensor, t: torch.Tensor, s=None, **cond) -> torch.Tensor:
        """log p_theta(x_s | x_t) = log sum_x0 q(x_s | x_t, x0) p_theta(x0 | x_t), `[B, K+1, N]`."""
        self._check_t(t, xt.shape[0])
        log_p0 = F.log_softmax(self.model_logits(model, xt, t, **cond), dim=1)
        return self._posterior_log_probs(log_p0, xt, t, self._resolve_s(t, s))

    # ---- losses ----------------------------------------------------------------------------------

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor,
                        generator: torch.Generator | None = None, **cond) -> dict[str, torch.Tensor]:
        """Per-sample terms `[B]` in nats per token.

        "kl": KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) for t > 0 and the decoder NLL
        -log p_theta(x_0 | x_{t=0}) at t = 0 (the same formula with s = -1), unweighted: the VLB term.
        "aux": the x_0 cross-entropy -log p_theta(x_0 | x_t), times aux_weight (2 - t/T) when adaptive.
        "loss": mask-weighted kl + mask-weighted aux.
        """
        xt = self.q_sample(x0, t, generator)
        kl, cross_entropy = self._kl_tokens(self.model_logits(model, xt, t, **cond), x0, xt, t, t - 1)
        weight = torch.where(xt == self.mask_id, self.mask_weight[0], self.mask_weight[1]).to(kl.dtype)
        aux_scale = self.aux_weight * (2 - t.double() / self.num_timesteps if self.adaptive_aux_weight
                                       else torch.ones_like(t, dtype=torch.float64))
        aux = aux_scale.to(kl.dtype) * (weight * cross_entropy).mean(dim=1)
        return {"loss": (weight * kl).mean(dim=1) + aux, "kl": kl.mean(dim=1), "aux": aux}

    def _kl_tokens(self, logits, x0, xt, t, s):
        """Per token `[B, N]`: KL(q(x_s | x_t, x_0) || sum_x0' q(x_s | x_t, x0') p(x0')) and -log p(x_0),
        for p = softmax(logits), without materialising either distribution.

        Both are mixtures b 1_K + a e_{x0} + d e_k (+ the same [MASK] weight), with k = x_t or, where
        x_t = [MASK], k = x_0 and d = 0. So KL = sum_i q_i log q_i - sum_i q_i log p_i needs p only at k
        and x_0 plus S = sum_i log(a_p p0_i + b_p), one pass over the classes.
        """
        K = self.num_classes
        k = torch.where(xt == self.mask_id, x0, xt)
        same = x0 == k
        probs, normalizer, picked = _SoftmaxPicks.apply(logits, torch.stack([k, x0], dim=1))
        lp_k, lp_x0 = (picked[:, i].double() - normalizer.double() for i in (0, 1))  # log p(x0 = . | x_t)
        p_mix = self.posterior_mixture(xt, t, s, lp_k.exp())
        q_mix = self.posterior_mixture(xt, t, s, same.double())
        a_p, b_p = p_mix.model, p_mix.uniform / K
        big_s = _SumLog.apply(probs, a_p.to(probs.dtype), b_p.to(probs.dtype)).double()
        log_a, log_b = _log(a_p, torch.float64), _log(b_p, torch.float64)
        sum_at_k = torch.logaddexp(log_a + lp_k, log_b)  # the S summand at k
        log_pk = torch.logaddexp(log_a + lp_k, _log(b_p + p_mix.keep, torch.float64))
        log_px0 = torch.where(same, log_pk, torch.logaddexp(log_a + lp_x0, log_b))
        a, b, d = q_mix.model, q_mix.uniform / K, q_mix.keep
        cross = b * (big_s - sum_at_k + log_pk) + a * log_px0 + d * log_pk
        q_k = b + d + torch.where(same, a, 0.0)
        entropy = (torch.xlogy(q_k, q_k) + torch.where(same, 0.0, torch.xlogy(a + b, a + b))
                   + (K - 1 - (~same).double()) * torch.xlogy(b, b))
        return (entropy - cross).to(logits.dtype), (-lp_x0).to(logits.dtype)

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{T-1} | x_0) || p(x_{T-1})) per token `[B]`, nats; the prior is [MASK] with gamma_bar_{T-1},
        else uniform over the K classes (what `sample_prior` draws)."""
        K, last = self.num_classes, torch.tensor([self.num_timesteps - 1])
        a, b, g = (self._table(n, last).squeeze() for n in ("alpha_bar", "beta_bar", "gamma_bar"))
        content = (1 - g) / K
        kl = torch.xlogy(a + b, (a + b) / content) + (K - 1) * torch.xlogy(b, b / content)
        return torch.full((x0.shape[0],), float(kl), device=x0.device)

    @torch.no_grad()
    def vlb(self, model, x0: torch.Tensor, generator: torch.Generator | None = None, **cond) -> torch.Tensor:
        """The variational bound `[B]` in bits per token: prior KL plus L_t for every t, each with one x_t."""
        self._check_tokens(x0, "x0", allow_mask=False)
        total = self.prior_kl(x0).double()
        for step in range(self.num_timesteps):
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
            xt = self.q_sample(x0, t, generator)
            kl, _ = self._kl_tokens(self.model_logits(model, xt, t, **cond), x0, xt, t, t - 1)
            total += kl.double().mean(dim=1)
        return (total / math.log(2.0)).float()

    # ---- sampling --------------------------------------------------------------------------------

    def sample_prior(self, batch_size: int, num_tokens: int, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
        """x_{T-1} ~ p(x_{T-1}): [MASK] with probability gamma_bar_{T-1}, else a uniform class."""
        gamma = float(self.schedule.gamma_bar[-1])
        shape = (batch_size, num_tokens)
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        random = torch.randint(self.num_classes, shape, generator=generator, device=device)
        return random.masked_fill(u < gamma, self.mask_id)

    def sample_iter(self, model, batch_size: int, num_tokens: int, cond: dict | None = None,
                    null_cond: dict | None = None, options: SamplingOptions | None = None,
                    known_tokens: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, progress: bool = False, device=None, **option_values):
        """Yield the token map `[B, N]` after every reverse step (see `sample`)."""
        options = _options(options, option_values)
        return sample_iter(self, model, batch_size, num_tokens, options, cond, null_cond, known_tokens, known_mask,
                           generator, progress, device)

    def sample(self, model, batch_size: int, num_tokens: int, cond: dict | None = None,
               null_cond: dict | None = None, options: SamplingOptions | None = None,
               known_tokens: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               generator: torch.Generator | None = None, progress: bool = True, device=None,
               **option_values) -> torch.Tensor:
        """Token ids `[B, N]` with no [MASK] left.

        `options` (a SamplingOptions), or its fields as keywords (steps=25, truncation_rate=0.86, ...): how to
        sample. The last step maps x_t straight to x_0. guidance_scale != 1 needs null_cond (same keys as cond)
        and calls the network once on 2B. known_tokens / known_mask `[B, N]`: inpainting, the known tokens stay
        fixed and the network sees them. device defaults to known_tokens', then cond's, then the generator's.
        """
        x = None
        for x in self.sample_iter(model, batch_size, num_tokens, cond, null_cond, options, known_tokens,
                                  known_mask, generator, progress, device, **option_values):
            pass
        return x


def _options(options: SamplingOptions | None, values: dict) -> SamplingOptions:
    if options is not None and values:
        raise ValueError(f"give the sampling options either as `options` or as keywords, not both ({sorted(values)})")
    return options if options is not None else SamplingOptions(**values)


class _SoftmaxPicks(torch.autograd.Function):
    """(softmax `[B, K, N]`, log-normaliser `[B, N]`, logits at `index` `[B, J, N]`) of logits `[B, K, N]`.

    The hand-written backward needs one full-size buffer where autograd would take one per op plus a
    zero-filled one per gather, and the forward never takes exp of subnormals (`stable_softmax`).
    """

    @staticmethod
    def forward(ctx, logits, index):
        probs, normalizer = stable_softmax(logits, dim=1)
        ctx.save_for_backward(probs, index)
        return probs, normalizer, logits.gather(1, index)

    @staticmethod
    def backward(ctx, grad_probs, grad_normalizer, grad_picked):
        probs, index = ctx.saved_tensors
        grad = torch.zeros_like(probs) if grad_probs is None else probs * grad_probs
        shift = grad.sum(dim=1, keepdim=True)  # <p, g>
        if grad_normalizer is not None:
            shift = shift - grad_normalizer.unsqueeze(1)
        grad.addcmul_(probs, shift, value=-1.0)  # p_j (g_j - <p, g> + g_normaliser)
        if grad_picked is not None:
            grad.scatter_add_(1, index, grad_picked)
        return grad, None


class _SumLog(torch.autograd.Function):
    """S = sum_i log(a p_i + b) over dim 1 of p `[B, K, N]` with per-token a, b `[B, N]`."""

    @staticmethod
    def forward(ctx, probs, a, b):
        ctx.save_for_backward(probs, a, b)
        inner = torch.addcmul(b.unsqueeze(1), a.unsqueeze(1), probs)
        return inner.clamp_min_(SUM_LOG_FLOOR).log_().sum(dim=1)

    @staticmethod
    def backward(ctx, grad):
        probs, a, b = ctx.saved_tensors
        inverse = torch.addcmul(b.unsqueeze(1), a.unsqueeze(1), probs).clamp_min_(SUM_LOG_FLOOR).reciprocal_()
        grad_b = grad * inverse.sum(dim=1)
        grad_a = grad * (probs * inverse).sum(dim=1)
        return inverse.mul_((grad * a).unsqueeze(1)), grad_a, grad_b


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den = 0 (the ratios of the absorbing limit)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def _log(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log of non-negative weights with 0 -> LOG_ZERO, in dtype; the gradient at 0 is 0, not NaN."""
    positive = w > 0
    return torch.where(positive, torch.log(torch.where(positive, w, 1.0)), LOG_ZERO).to(dtype)
