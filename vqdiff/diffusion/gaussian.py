"""Gaussian diffusion (Ho et al. 2020) with the improvements of Nichol & Dhariwal 2021.

Follows openai/improved-diffusion's `GaussianDiffusion`: the same table names, mean and variance
parameterisations and loss types, plus v-prediction (Salimans & Ho 2022) and DDIM sampling (Song et
al. 2021). Steps are 0-based: x_0 is the data and t = 0 .. T-1 index the noising steps, so x_t is the
state after step t (the papers' x_{t+1}). The network is any callable `model(x_t, t, **cond)`; with a
learned variance it returns twice the data's channels on dim 1 (mean part first, variance part second).
Data are images `[B, C, H, W]` or vectors `[B, D]`; nothing assumes a number of dimensions.
"""

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..options import LossType, MeanType, Sampler, VarType
from .guidance import guide, guided_call
from .losses import discretized_gaussian_log_likelihood, gaussian_log_likelihood, mean_flat, normal_kl
from .respace import respace_betas, space_timesteps, validate_timesteps
from .tensors import check_timesteps, extract, noise_like, nonzero, randn, sample_device

LOG2 = math.log(2.0)
LEARNED_VARIANCES = (VarType.LEARNED, VarType.LEARNED_RANGE)


class GaussianDiffusion:
    """The forward process q, the reverse process p, training losses, bits/dim and samplers.

    betas: `[T]` noise schedule in (0, 1), e.g. `schedules.beta_schedule("cosine", 1000)`.
    rescale_timesteps: the network sees t * 1000 / T as a float (improved-diffusion's option).
    discrete_data: the t = 0 term is the discretized decoder NLL of 8-bit data in [-1, 1]; set False
        for continuous data (2-D toy sets) to use the Gaussian density instead.
    lambda_vlb: the weight of L_vlb in the HYBRID loss (Nichol & Dhariwal use 0.001).
    timestep_map, original_num_timesteps: set by `respace`; the network always sees original indices.
    """

    def __init__(self, betas, mean_type: "MeanType | str" = MeanType.EPSILON,
                 var_type: "VarType | str" = VarType.FIXED_LARGE, loss_type: "LossType | str" = LossType.MSE,
                 *, rescale_timesteps: bool = False, discrete_data: bool = True, lambda_vlb: float = 0.001,
                 timestep_map: "Iterable[int] | None" = None, original_num_timesteps: int | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"GaussianDiffusion: betas must be a non-empty 1-D sequence, got shape "
                             f"{tuple(betas.shape)}")
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("GaussianDiffusion: every beta must lie in (0, 1)")
        self.mean_type = MeanType(mean_type)
        self.var_type = VarType(var_type)
        self.loss_type = LossType(loss_type)
        self.rescale_timesteps = rescale_timesteps
        self.discrete_data = discrete_data
        self.lambda_vlb = lambda_vlb
        self.num_timesteps = T = betas.shape[0]
        self.original_num_timesteps = original_num_timesteps or T
        self.timestep_map = (torch.arange(T) if timestep_map is None
                             else torch.as_tensor(list(timestep_map), dtype=torch.long))
        if self.timestep_map.shape != (T,):
            raise ValueError(f"GaussianDiffusion: timestep_map has {self.timestep_map.numel()} entries for "
                             f"{T} betas")
        self._make_tables(betas)

    def _make_tables(self, betas: torch.Tensor) -> None:
        """float64 tables `[T]`, as named in improved-diffusion."""
        self.betas = betas
        self.log_betas = torch.log(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0), Ho et al. 2020 eq. (6)-(7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance at t = 0 is 0: borrow the next step's so the log stays finite
        first = self.posterior_variance[1:2] if len(betas) > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_mean_coef1 = betas * torch.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / one_minus
        self.large_log_variance = torch.cat([self.posterior_log_variance_clipped[:1], self.log_betas[1:]])

    # ---- timesteps and respacing --------------------------------------------------------------

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the network sees: original indices, or t * 1000 / T with rescale_timesteps."""
        original = self.timestep_map.to(t.device)[t]
        if self.rescale_timesteps:
            return original.float() * (1000.0 / self.original_num_timesteps)
        return original

    def respace(self, steps: "int | str | Iterable[int]") -> "GaussianDiffusion":
        """The same process on fewer steps: an int / "50" / "10,10,10" / "ddim50" (see `space_timesteps`)
        or explicit indices into this diffusion's steps. alpha_bar is unchanged at the kept steps."""
        if isinstance(steps, (int, str)):
            steps = space_timesteps(self.num_timesteps, steps)
        kept = validate_timesteps(steps, self.num_timesteps)
        return GaussianDiffusion(
            respace_betas(self.alphas_cumprod, kept), self.mean_type, self.var_type, self.loss_type,
            rescale_timesteps=self.rescale_timesteps, discrete_data=self.discrete_data,
            lambda_vlb=self.lambda_vlb, timestep_map=self.timestep_map[kept],
            original_num_timesteps=self.original_num_timesteps)

    # ---- the forward process q ----------------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0) (Ho et al. 2020 eq. 4)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = extract(1.0 - self.alphas_cumprod, t, x0)
        log_variance = extract(torch.log1p(-self.alphas_cumprod), t, x0)
        return mean, variance, log_variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        check_timesteps(t, x0)
        noise = noise_like(x0, noise, generator)
        return (extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020 eq. 6-7)."""
        mean = (extract(self.posterior_mean_coef1, t, xt) * x0
                + extract(self.posterior_mean_coef2, t, xt) * xt)
        variance = extract(self.posterior_variance, t, xt)
        log_variance = extract(self.posterior_log_variance_clipped, t, xt)
        return mean, variance, log_variance

    # ---- conversions between parameterisations (all given x_t) --------------------------------

    def predict_xstart_from_eps(self, xt, t, eps):
        return (extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt
                - extract(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps)

    def predict_eps_from_xstart(self, xt, t, pred_xstart):
        return ((extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - pred_xstart)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, xt))

    def predict_xstart_from_v(self, xt, t, v):
        return (extract(self.sqrt_alphas_cumprod, t, xt) * xt
                - extract(self.sqrt_one_minus_alphas_cumprod, t, xt) * v)

    def predict_v_from_xstart(self, xt, t, pred_xstart):
        """v = (sqrt(abar) x_t - x_0) / sqrt(1 - abar), the same v as `velocity` for the implied noise."""
        return ((extract(self.sqrt_alphas_cumprod, t, xt) * xt - pred_xstart)
                / extract(self.sqrt_one_minus_alphas_cumprod, t, xt))

    def predict_xstart_from_xprev(self, xt, t, xprev):
        """Invert the posterior mean: x_0 = (mu - coef2 x_t) / coef1."""
        return ((xprev - extract(self.posterior_mean_coef2, t, xt) * xt)
                / extract(self.posterior_mean_coef1, t, xt))

    def velocity(self, x0, noise, t):
        """The v-prediction target sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    # ---- the reverse process p ----------------------------------------------------------------

    def p_mean_variance(self, model: Callable, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                        denoised_fn: Callable | None = None, cond: dict | None = None) -> dict:
        """p(x_{t-1} | x_t): dict of "mean", "variance", "log_variance", "pred_xstart" (all shaped like x)."""
        check_timesteps(t, x)
        out = model(x, self.model_timesteps(t), **(cond or {}))
        return self.p_mean_variance_from_output(out, x, t, clip_denoised, denoised_fn)

    def p_mean_variance_from_output(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                                    clip_denoised: bool = True, denoised_fn: Callable | None = None) -> dict:
        """As `p_mean_variance`, from a network output already computed."""
        mean_out, var_out = self._split_output(out, x)
        log_variance = self._model_log_variance(var_out, x, t)
        pred_xstart = self._predict_xstart(mean_out, x, t)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        if self.mean_type is MeanType.PREVIOUS_X:
            mean = mean_out
        else:
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def _split_output(self, out: torch.Tensor, x: torch.Tensor):
        if self.var_type in LEARNED_VARIANCES:
            if out.ndim != x.ndim or out.shape[1] != 2 * x.shape[1] or out.shape[2:] != x.shape[2:]:
                raise ValueError(f"var_type={self.var_type.value} needs a model output with 2x the channels of "
                                 f"x on dim 1: x is {tuple(x.shape)}, output is {tuple(out.shape)}")
            return torch.split(out, x.shape[1], dim=1)
        if out.shape != x.shape:
            raise ValueError(f"var_type={self.var_type.value} needs a model output shaped like x "
                             f"{tuple(x.shape)}, got {tuple(out.shape)}")
        return out, None

    def _model_log_variance(self, var_out, x, t):
        if self.var_type is VarType.LEARNED:
            return var_out
        if self.var_type is VarType.LEARNED_RANGE:
            # N&D eq. 15: interpolate log beta_tilde and log beta with v = (out + 1) / 2
            fraction = (var_out + 1.0) / 2.0
            return (fraction * extract(self.log_betas, t, x)
                    + (1.0 - fraction) * extract(self.posterior_log_variance_clipped, t, x))
        if self.var_type is VarType.FIXED_LARGE:
            return extract(self.large_log_variance, t, x)
        return extract(self.posterior_log_variance_clipped, t, x)

    def _predict_xstart(self, mean_out, x, t):
        if self.mean_type is MeanType.EPSILON:
            return self.predict_xstart_from_eps(x, t, mean_out)
        if self.mean_type is MeanType.VELOCITY:
            return self.predict_xstart_from_v(x, t, mean_out)
        if self.mean_type is MeanType.PREVIOUS_X:
            return self.predict_xstart_from_xprev(x, t, mean_out)
        return mean_out

    # ---- losses and the variational bound -----------------------------------------------------

    def training_losses(self, model: Callable, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        **cond) -> dict[str, torch.Tensor]:
        """Per-sample terms `[B]`: "loss", plus "mse" (MSE types, HYBRID) and "vb" (L_t in bits/dim).

        "loss" = mse + w * vb, where w is 1 (MSE with a learned variance, KL), T/1000 (RESCALED_*) or
        lambda_vlb * T (HYBRID, as L_vlb = T E_t[L_t]); without a learned variance MSE and RESCALED_MSE
        have no vb term. Next to an MSE term the vb term sees the mean through a stop-gradient (N&D
        Sec. 3.1), so HYBRID with a fixed variance trains like MSE and only reports the bound.
        """
        noise = noise_like(x0, noise, generator)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.model_timesteps(t), **cond)
        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            vb = self._vb_terms_bpd(out, x0, xt, t, clip_denoised=False)["output"]
            return {"loss": self._vb_weight() * vb, "vb": vb}
        mean_out, var_out = self._split_output(out, x0)
        mse = mean_flat((self._mse_target(x0, xt, t, noise) - mean_out) ** 2)
        terms = {"loss": mse, "mse": mse}
        if var_out is not None or self.loss_type is LossType.HYBRID:
            frozen = mean_out.detach() if var_out is None else torch.cat([mean_out.detach(), var_out], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x0, xt, t, clip_denoised=False)["output"]
            terms["loss"] = mse + self._vb_weight() * terms["vb"]
        return terms

    def _vb_weight(self) -> float:
        if self.loss_type in (LossType.RESCALED_MSE, LossType.RESCALED_KL):
            return self.num_timesteps / 1000.0
        if self.loss_type is LossType.HYBRID:
            return self.lambda_vlb * self.num_timesteps
        return 1.0

    def _mse_target(self, x0, xt, t, noise):
        if self.mean_type is MeanType.EPSILON:
            return noise
        if self.mean_type is MeanType.VELOCITY:
            return self.velocity(x0, noise, t)
        if self.mean_type is MeanType.PREVIOUS_X:
            return self.q_posterior_mean_variance(x0, xt, t)[0]
        return x0

    def _vb_terms_bpd(self, out, x0, xt, t, clip_denoised: bool) -> dict:
        """L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        p = self.p_mean_variance_from_output(out, xt, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / LOG2
        log_scale = 0.5 * p["log_variance"]
        if self.discrete_data:
            log_likelihood = discretized_gaussian_log_likelihood(x0, p["mean"], log_scale)
        else:
            log_likelihood = gaussian_log_likelihood(x0, p["mean"], log_scale)
        decoder_nll = -mean_flat(log_likelihood) / LOG2
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": p["pred_xstart"]}

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{T-1} | x_0) || N(0, I)) in bits/dim `[B]`: the prior term of the bound (not trained)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))) / LOG2

    @torch.no_grad()
    def calc_bpd_loop(self, model: Callable, x0: torch.Tensor, clip_denoised: bool = True,
                      progress: bool = False, generator: torch.Generator | None = None,
                      **cond) -> dict[str, torch.Tensor]:
        """The full variational bound in bits/dim, one fresh x_t per step.

        Returns "total_bpd" `[B]` (= vb.sum(1) + prior_bpd), "prior_bpd" `[B]`, and `[B, T]` tables
        "vb" (L_t), "xstart_mse" and "mse" (of the implied noise), whose column t belongs to step t.
        """
        terms = {"vb": [], "xstart_mse": [], "mse": []}
        for step in tqdm(range(self.num_timesteps), disable=not progress, desc="bits/dim"):
            t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
            noise = noise_like(x0, None, generator)
            xt = self.q_sample(x0, t, noise)
            vb = self._vb_terms_bpd(model(xt, self.model_timesteps(t), **cond), x0, xt, t, clip_denoised)
            eps = self.predict_eps_from_xstart(xt, t, vb["pred_xstart"])
            terms["vb"].append(vb["output"])
            terms["xstart_mse"].append(mean_flat((vb["pred_xstart"] - x0) ** 2))
            terms["mse"].append(mean_flat((eps - noise) ** 2))
        terms = {name: torch.stack(values, dim=1) for name, values in terms.items()}
        terms["prior_bpd"] = self.prior_bpd(x0)
        terms["total_bpd"] = terms["vb"].sum(dim=1) + terms["prior_bpd"]
        return terms

    # ---- sampling ------------------------------------------------------------------------------

    def p_sample(self, model: Callable, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 denoised_fn: Callable | None = None, cond: dict | None = None,
                 generator: torch.Generator | None = None) -> dict:
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise at t = 0."""
        p = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, cond)
        noise = noise_like(x, None, generator)
        sample = p["mean"] + nonzero(t, x) * torch.exp(0.5 * p["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": p["pred_xstart"], "mean": p["mean"],
                "variance": p["variance"]}

    def ddim_sample(self, model: Callable, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                    denoised_fn: Callable | None = None, cond: dict | None = None, eta: float = 0.0,
                    generator: torch.Generator | None = None) -> dict:
        """One DDIM step (Song et al. 2021 eq. 12) with sigma_t^2 = eta^2 beta_tilde_t (their eq. 16)."""
        p = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, cond)
        eps = self.predict_eps_from_xstart(x, t, p["pred_xstart"])
        variance = eta ** 2 * self.posterior_variance
        direction = torch.sqrt((1.0 - self.alphas_cumprod_prev - variance).clamp_min(0.0))
        mean = (extract(torch.sqrt(self.alphas_cumprod_prev), t, x) * p["pred_xstart"]
                + extract(direction, t, x) * eps)
        sample = mean
        if eta != 0:
            noise = noise_like(x, None, generator)
            sample = mean + nonzero(t, x) * extract(torch.sqrt(variance), t, x) * noise
        return {"sample": sample, "pred_xstart": p["pred_xstart"], "mean": mean,
                "variance": extract(variance, t, x)}

    @torch.no_grad()
    def sample_iter(self, model: Callable, shape: tuple, cond: dict | None = None,
                    steps: "int | str | Iterable[int] | None" = None, sampler: "Sampler | str" = Sampler.DDPM,
                    eta: float = 0.0, clip_denoised: bool = True, denoised_fn: Callable | None = None,
                    guidance_scale: float = 1.0, null_cond: dict | None = None,
                    generator: torch.Generator | None = None, progress: bool = True,
                    noise: torch.Tensor | None = None, device=None) -> Iterator[dict]:
        """Yield {"sample", "pred_xstart", "t"} after each reverse step; "t" is the original step index.

        steps: None for every step, else as `respace`. Guidance (Ho & Salimans 2022) needs `null_cond`
        and costs one 2B-sized call per step; see `sample` for the arguments.
        """
        sampler = Sampler(sampler)
        if sampler is Sampler.DDPM and eta != 0:
            raise ValueError("eta applies to the DDIM sampler only; pass sampler='ddim'")
        diffusion = self if steps is None else self.respace(steps)
        guided = self._guided_model(model, null_cond, guidance_scale)
        cond = cond or {}
        device = sample_device(device, noise, model, cond)
        x = randn(tuple(shape), generator, device, torch.float32) if noise is None else noise
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"sample: noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
        for step in tqdm(reversed(range(diffusion.num_timesteps)), total=diffusion.num_timesteps,
                         disable=not progress, desc="sampling"):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            if sampler is Sampler.DDPM:
                out = diffusion.p_sample(guided, x, t, clip_denoised, denoised_fn, cond, generator)
            else:
                out = diffusion.ddim_sample(guided, x, t, clip_denoised, denoised_fn, cond, eta, generator)
            x = out["sample"]
            yield {"sample": x, "pred_xstart": out["pred_xstart"], "t": int(diffusion.timestep_map[step])}

    def sample(self, model: Callable, shape: tuple, cond: dict | None = None,
               steps: "int | str | Iterable[int] | None" = None, sampler: "Sampler | str" = Sampler.DDPM,
               eta: float = 0.0, clip_denoised: bool = True, denoised_fn: Callable | None = None,
               guidance_scale: float = 1.0, null_cond: dict | None = None,
               generator: torch.Generator | None = None, progress: bool = True,
               noise: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """Draw samples `shape` (batch first) from x_T ~ N(0, I) (or `noise`).

        cond / null_cond: keyword inputs of the network, batch on dim 0; guidance_scale s applies
        null + s (cond - null) to the mean-type output (eps / x_0 / v / x_{t-1}), while a learned variance
        comes from the conditional half. sampler: "ddpm" or "ddim" (with eta). device defaults to the
        noise's, then the network's (an nn.Module), then the first conditioning tensor's; the generator may
        live on another device (draws are made there and moved).
        """
        state = None
        for state in self.sample_iter(model, shape, cond, steps, sampler, eta, clip_denoised, denoised_fn,
                                      guidance_scale, null_cond, generator, progress, noise, device):
            pass
        return state["sample"]

    def _guided_model(self, model: Callable, null_cond: dict | None, guidance_scale: float) -> Callable:
        if guidance_scale == 1.0:
            return model
        if null_cond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs null_cond (the unconditional inputs)")
        learned = self.var_type in LEARNED_VARIANCES

        def guided(x, t, **cond):
            cond_out, null_out = guided_call(model, x, t, cond, null_cond, guidance_scale)
            if not learned:
                return guide(cond_out, null_out, guidance_scale)
            cond_mean, cond_var = torch.split(cond_out, x.shape[1], dim=1)
            null_mean = null_out[:, : x.shape[1]]
            return torch.cat([guide(cond_mean, null_mean, guidance_scale), cond_var], dim=1)

        return guided
