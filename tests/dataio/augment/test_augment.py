"""The augmentation chain: each op against a plain reference, keyed draws, planning, bad input."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from dataio.augment import OPS, BatchIds, build_augmenter, parse_chain
from dataio.augment.keyed import M32, mix, uniforms
from dataio.errors import ConfigError
from dataio.frontend import FrontendConfig, LogMel

RATE = 16000
FRONT = FrontendConfig(n_mels=32)


def _aug(section, view=0.5, views=2, pairs=1, seed=0, frontend=FRONT):
    return build_augmenter(section, frontend, view, num_views=views, pairs_per_clip=pairs, seed=seed)


def _ids(b, pairs=1, epoch=0, step=0, first=0):
    return BatchIds(indices=torch.arange(first, first + b).repeat_interleave(pairs),
                    draws=torch.arange(pairs).repeat(b), epoch=epoch, step=step, rank=0)


def _tones(b, v, samples, seed=0):
    """[b, v, samples] sines of random pitch and level, one clip per row."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / RATE
    freq = 200 + 1500 * torch.rand(b, 1, 1, generator=g)
    amp = 0.05 + 0.3 * torch.rand(b, 1, 1, generator=g)
    return (amp * torch.sin(2 * math.pi * freq * t)).expand(b, v, samples).contiguous()


def _waves_through(aug, x):
    """Run only the waveform ops of ``aug`` on [N, S] rows (view 0 of N clips)."""
    rows = aug._rows(_ids(x.shape[0]), x.shape[0], 1, x.device)
    for op in aug.wave_ops:
        x = aug._apply(op, x, rows)
    return x


# ---------------------------------------------------------------- keyed draws

def test_hash_matches_plain_32_bit_arithmetic():
    def ref(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & M32
        x ^= x >> 15
        x = (x * 0x846CA68B) & M32
        return x ^ (x >> 16)

    values = np.random.default_rng(0).integers(0, 2 ** 32, 2000, dtype=np.int64)
    assert mix(torch.from_numpy(values)).tolist() == [ref(int(v)) for v in values]
    u = uniforms(torch.from_numpy(values), 7, 3)
    assert u.shape == (2000, 3) and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.02


def test_a_views_draws_do_not_depend_on_its_batch_neighbours():
    aug = _aug({"gain": {}, "speed": {"p": 0.5}, "noise": {}, "rrc": {}, "time_mask": {}, "pitch_shift": {}})
    waves = _tones(6, 2, aug.input_samples)
    full = aug.from_waves(waves, _ids(6))
    order = torch.tensor([4, 1, 5, 0])
    part = aug.from_waves(waves[order], BatchIds(order, torch.zeros(4, dtype=torch.long), 0, 3, 1))
    torch.testing.assert_close(part, full[order], rtol=0, atol=1e-5)
    again = aug.from_waves(waves, _ids(6, epoch=1))
    assert not torch.allclose(again, full), "a new epoch draws anew"


def test_adding_an_op_shifts_no_other_draw():
    base = {"gain": {}, "rrc": {}, "time_mask": {}}
    more = {"noise": {"p": 0.0}, "gain": {}, "shift": {"seconds": [0.0, 0.0]}, "rrc": {},
            "compress": {"factor": [1.0, 1.0]}, "time_mask": {}}
    waves = _tones(4, 2, 8000)
    torch.testing.assert_close(_aug(more).from_waves(waves, _ids(4)), _aug(base).from_waves(waves, _ids(4)),
                               rtol=0, atol=1e-5)


def test_per_clip_draws_are_shared_by_the_views_and_views_filter():
    aug = _aug({"gain": {"db": [-20.0, 20.0], "per": "clip"}})
    waves = _tones(5, 2, aug.input_samples)
    x = waves.reshape(10, -1)
    rows = aug._rows(_ids(5), 5, 2, x.device)
    out = aug._apply(aug.wave_ops[0], x, rows).reshape(5, 2, -1)
    ratio = out[..., 100] / waves[..., 100]
    torch.testing.assert_close(ratio[:, 0], ratio[:, 1])
    only_anchor = _aug({"gain": {"db": [12.0, 12.0], "views": [0]}})
    rows = only_anchor._rows(_ids(5), 5, 2, x.device)
    out = only_anchor._apply(only_anchor.wave_ops[0], x, rows).reshape(5, 2, -1)
    torch.testing.assert_close(out[:, 1], waves[:, 1])
    torch.testing.assert_close(out[:, 0], waves[:, 0] * 10 ** 0.6)


def test_the_looc_recipe_gives_views_0_and_2_one_frequency_change_and_view_1_its_own():
    """configs/demo_looc.yaml: the frequency ops drawn per clip for views [0, 2] and per
    view for view 1; the same wave in all three views comes out the same in 0 and 2 only."""
    import yaml

    from tests.conftest import REPO

    chain = yaml.safe_load((REPO / "configs/demo_looc.yaml").read_text())["augment"]
    freq = {k: v for k, v in chain.items() if (v.get("op") or k) in ("rrc", "pitch_shift")}
    assert len(freq) == 5  # the time crop, a frequency crop and a pitch shift for each side
    aug = _aug(freq, views=3)
    waves = _tones(6, 1, aug.input_samples).expand(6, 3, -1).contiguous()
    out = aug.from_waves(waves, _ids(6))
    assert not torch.allclose(out[:, 0], out[:, 2])  # the time crop is each view's own
    freq_only = {k: v for k, v in freq.items() if k != "rrc"}
    out = _aug(freq_only, views=3).from_waves(waves, _ids(6))
    torch.testing.assert_close(out[:, 0], out[:, 2], rtol=0, atol=0)
    assert all(not torch.allclose(out[i, 0], out[i, 1]) for i in range(6))


def test_probability_gates_about_that_share_of_views():
    aug = _aug({"polarity": {"p": 0.3}})
    x = torch.ones(4000, aug.input_samples)
    out = _waves_through(aug, x)
    assert abs(float((out[:, 0] < 0).float().mean()) - 0.3) < 0.03


# ---------------------------------------------------------------- planning

def test_the_chain_plans_input_samples_from_the_end():
    assert _aug({}).input_samples == 8000
    speed = _aug({"speed": {"factor": [0.8, 1.25]}})
    assert speed.input_samples == math.ceil(7999 * 1.25) + 2
    stretch = _aug({"time_stretch": {"factor": [0.9, 1.2]}})
    frames = FRONT.num_frames(8000)
    assert stretch.mel_frames_in == math.ceil((frames - 1) * 1.2) + 2
    assert stretch.input_samples == 8000 + (stretch.mel_frames_in - frames) * FRONT.hop_length
    for aug in (speed, stretch):
        out = aug.from_waves(_tones(3, 2, aug.input_samples), _ids(3))
        assert out.shape == (3, 2, 1, 32, frames)


def test_empty_chain_is_the_plain_log_mel_and_channels_replicate():
    waves = _tones(3, 2, 8000)
    torch.testing.assert_close(_aug({}).from_waves(waves, _ids(3)), LogMel(FRONT)(waves), rtol=0, atol=0)
    three = FrontendConfig(n_mels=32, channels=3)
    out = _aug({"time_mask": {}}, frontend=three).from_waves(waves, _ids(3))
    assert out.shape == (3, 2, 3, 32, 51) and torch.equal(out[:, :, 0], out[:, :, 2])


# ---------------------------------------------------------------- waveform ops

def test_gain_polarity_reverse_shift():
    x = _tones(4, 1, 8000)[:, 0]
    torch.testing.assert_close(_waves_through(_aug({"gain": {"db": [6.0, 6.0]}}), x), x * 10 ** 0.3)
    torch.testing.assert_close(_waves_through(_aug({"polarity": {}}), x), -x)
    torch.testing.assert_close(_waves_through(_aug({"reverse": {}}), x), x.flip(-1))
    shifted = _waves_through(_aug({"shift": {"seconds": [0.01, 0.01]}}), x)
    torch.testing.assert_close(shifted[:, 160:], x[:, :-160])
    assert float(shifted[:, :160].abs().max()) == 0


def test_mixback_mixes_another_clip_at_the_views_energy():
    aug = _aug({"mixback": {"weight": [0.2, 0.2]}})
    waves = _tones(6, 2, 8000)
    x = waves.reshape(12, -1)
    rows = aug._rows(_ids(6), 6, 2, x.device)
    partners = rows.ctx.partners(aug.wave_ops[0].salt)
    assert (partners // 2 != torch.arange(12) // 2).all(), "never the clip itself"
    assert (partners % 2 == torch.arange(12) % 2).all(), "the same view of the partner"
    out = aug._apply(aug.wave_ops[0], x, rows)
    b = x[partners]
    ex, eb = x.pow(2).mean(1, keepdim=True), b.pow(2).mean(1, keepdim=True)
    torch.testing.assert_close(out, math.sqrt(0.8) * x + torch.sqrt(0.2 * ex / eb) * b)
    other_step = aug._rows(BatchIds(torch.arange(6), torch.zeros(6, dtype=torch.long), 0, 1, 0), 6, 2, x.device)
    assert not torch.equal(other_step.ctx.partners(aug.wave_ops[0].salt), partners), "partners change per step"


@pytest.mark.parametrize("color", ["white", "pink", "brown"])
def test_noise_lands_at_the_drawn_snr(color):
    x = _tones(16, 1, 8000)[:, 0]
    out = _waves_through(_aug({"noise": {"snr_db": [10.0, 10.0], "colors": [color]}}), x)
    noise = out - x
    snr = 10 * torch.log10(x.pow(2).mean(1) / noise.pow(2).mean(1))
    assert float((snr - 10).abs().max()) < 1.5
    spectrum = torch.fft.rfft(noise).abs().pow(2).mean(0)
    low, high = float(spectrum[10:200].mean()), float(spectrum[2000:4000].mean())
    assert (low / high > 20) if color != "white" else (0.5 < low / high < 2)
    assert not torch.allclose(noise[0], noise[1]), "every view reads its own noise"


def test_speed_scales_a_tones_frequency():
    aug = _aug({"speed": {"factor": [1.25, 1.25]}})
    t = torch.arange(aug.input_samples) / RATE
    x = torch.sin(2 * math.pi * 400 * t)[None]
    out = _waves_through(aug, x)
    assert out.shape == (1, 8000)
    peak_hz = float(torch.fft.rfft(out[0] * torch.hann_window(8000)).abs().argmax()) * RATE / 8000
    assert abs(peak_hz - 500) < 4


def test_rir_from_a_folder_against_numpy_convolution(tmp_path):
    ir = np.zeros(1200, dtype=np.float32)
    ir[[0, 400, 1100]] = [1.0, 0.5, -0.25]
    sf.write(tmp_path / "room.wav", ir, RATE)
    x = _tones(3, 1, 8000)[:, 0]
    out = _waves_through(_aug({"rir": {"folder": str(tmp_path)}}), x)
    want = np.stack([np.convolve(row, ir)[:8000] for row in x.numpy()])
    want *= np.sqrt((x.numpy() ** 2).mean(1, keepdims=True) / (want ** 2).mean(1, keepdims=True))
    np.testing.assert_allclose(out.numpy(), want, atol=2e-5)


def test_synthetic_rooms_reverberate_at_the_views_power():
    x = torch.zeros(8, 8000)
    x[:, 1000] = 1.0  # an impulse: the output is the room
    out = _waves_through(_aug({"rir": {"rt60": [0.3, 0.3], "drr_db": [0.0, 0.0]}}), x)
    torch.testing.assert_close(out.pow(2).mean(1), x.pow(2).mean(1))
    tail = out[:, 1100:].pow(2).sum(1) / out[:, 1000:].pow(2).sum(1)
    assert float(tail.min()) > 0.3, "about half the energy (0 dB DRR) is in the tail"


def test_trim_moves_the_sound_and_keeps_it_whole():
    x = torch.zeros(6, 8000)
    burst = torch.sin(torch.arange(1000) * 0.3 + 0.5) * 0.5
    x[:, 3000:4000] = burst
    out = _waves_through(_aug({"trim": {}}), x)
    starts = [int(torch.nonzero(row).min()) for row in out]
    for row, start in zip(out, starts):
        torch.testing.assert_close(row[start:start + 1000], burst, atol=1e-6, rtol=0)
        assert float(row.abs().sum()) == pytest.approx(float(burst.abs().sum()), rel=1e-5)
    assert len(set(starts)) > 1, "placed at random offsets"
    silent = torch.zeros(2, 8000)
    assert torch.equal(_waves_through(_aug({"trim": {}}), silent), silent)


# ---------------------------------------------------------------- log-mel ops

def _mel_through(section, mels):
    aug = _aug(section)
    rows = aug._rows(_ids(mels.shape[0]), mels.shape[0], 1, mels.device)
    x = mels
    for op in aug.mel_ops:
        x = aug._apply(op, x, rows)
    return x


def _mels(n=6, frames=51):
    return torch.randn(n, 32, frames, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("axis", ["time", "freq"])
def test_masks_cover_the_drawn_widths_with_the_fill(axis):
    x = _mels()
    out = _mel_through({f"{axis}_mask": {"count": [1, 1], "width": [5, 5], "fill": "zero"}}, x)
    changed = (out != x).any(dim=1 if axis == "time" else 2)  # [N, T] or [N, F]
    assert (changed.sum(1) == 5).all()
    assert bool((out[out != x] == 0).all())
    mean_fill = _mel_through({f"{axis}_mask": {"count": [2, 2], "width": [3, 3]}}, x)
    assert (mean_fill != x).any()


def test_rrc_at_full_scale_is_the_identity_and_crops_otherwise():
    x = _mels()
    torch.testing.assert_close(_mel_through({"rrc": {"time_scale": [1.0, 1.0], "freq_scale": [1.0, 1.0]}}, x), x,
                               atol=1e-5, rtol=0)
    ramp = torch.arange(51, dtype=torch.float32).expand(2, 32, 51).contiguous()
    out = _mel_through({"rrc": {"time_scale": [0.5, 0.5], "freq_scale": [1.0, 1.0]}}, ramp)
    steps = out[:, 0, 1:] - out[:, 0, :-1]
    torch.testing.assert_close(steps[:, 5:-5], torch.full_like(steps[:, 5:-5], 0.5), atol=1e-4, rtol=0)


def test_compress_scales_contrast_about_the_mean():
    x = _mels()
    out = _mel_through({"compress": {"factor": [0.5, 0.5]}}, x)
    torch.testing.assert_close(out.mean(dim=(1, 2)), x.mean(dim=(1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(1, 2)), 0.5 * x.std(dim=(1, 2)), atol=1e-5, rtol=0)


def test_mel_noise_has_the_drawn_std():
    x = _mels(8)
    diff = _mel_through({"mel_noise": {"std": [0.2, 0.2]}}, x) - x
    assert float((diff.std(dim=(1, 2)) - 0.2).abs().max()) < 0.01


def test_mel_mixback_is_fonsecas_equation_on_linear_power():
    fe = FRONT
    x = _mels(6) * 0.5
    out = _mel_through({"mel_mixback": {"weight": [0.3, 0.3]}}, x)
    power = 10 ** ((x.double() * fe.norm_std + fe.norm_mean) / 10)
    aug = _aug({"mel_mixback": {"weight": [0.3, 0.3]}})
    partners = aug._rows(_ids(6), 6, 1, x.device).ctx.partners(aug.mel_ops[0].salt)
    b = power[partners]
    ratio = power.sum(dim=(1, 2), keepdim=True) / b.sum(dim=(1, 2), keepdim=True)
    want = (10 * torch.log10((0.7 * power + 0.3 * ratio * b).clamp_min(fe.log_floor)) - fe.norm_mean) / fe.norm_std
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=0)


def test_time_stretch_reads_frames_at_the_drawn_rate():
    x = torch.arange(40, dtype=torch.float32).expand(2, 32, 40).contiguous()
    aug = _aug({"time_stretch": {"factor": [2.0, 2.0]}})
    op = aug.mel_ops[0]
    op.out_size = 15
    rows = aug._rows(_ids(2), 2, 1, x.device)
    out = op.apply(x, torch.zeros(2, 1), rows.ctx)
    torch.testing.assert_close(out[0, 0], torch.arange(0, 30, 2, dtype=torch.float32))


def test_pitch_shift_moves_a_tone_by_the_semitones():
    fe = FrontendConfig(n_mels=64)
    t = torch.arange(8000) / RATE
    mel = LogMel(fe)(torch.sin(2 * math.pi * 1000 * t)[None])[:, 0]
    aug = _aug({"pitch_shift": {"semitones": [12.0, 12.0]}}, frontend=fe)
    rows = aug._rows(_ids(1), 1, 1, mel.device)
    out = aug._apply(aug.mel_ops[0], mel, rows)
    from dataio.augment.mel import mel_band_position

    want = float(mel_band_position(torch.tensor([2000.0]), fe)[0])
    assert abs(int(out[0].mean(1).argmax()) - want) <= 1
    assert abs(int(mel[0].mean(1).argmax()) - float(mel_band_position(torch.tensor([1000.0]), fe)[0])) <= 1


def test_every_registered_op_runs_on_a_batch_with_short_and_silent_views():
    waves = _tones(4, 2, 20000)
    waves[0] = 0.0  # a silent clip
    waves[1, :, 300:] = 0.0  # a clip far shorter than the view, zero-padded
    for name in OPS:
        aug = _aug({name: {}})
        out = aug.from_waves(waves[..., :aug.input_samples], _ids(4))
        assert out.shape == (4, 2, 1, 32, 51) and torch.isfinite(out).all(), name


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("section, message", [
    ({"rcc": {}}, "augment.rcc: unknown op 'rcc' (did you mean 'rrc'?)"),
    ({"gain": {"p": 1.5}}, "augment.gain.p: must be a probability in [0, 1], got 1.5"),
    ({"gain": {"db": [6, -6]}}, "augment.gain.db: the range [6.0, -6.0] is reversed"),
    ({"gain": {"db": []}}, "augment.gain.db: must be a range [low, high]"),
    ({"speed": {"factor": [0.0, 1.2]}}, "augment.speed.factor: must be >= 0.25"),
    ({"noise": {"snr_db": [40, 10]}}, "augment.noise.snr_db: the range [40.0, 10.0] is reversed"),
    ({"noise": {"colors": ["blue"]}}, "augment.noise.colors: must be a non-empty list"),
    ({"time_mask": {"width": [0, 2.5]}}, "augment.time_mask.width[1]: expected int"),
    ({"gain": {"dB": [1, 2]}}, "unknown key 'augment.gain.dB' (did you mean augment.gain.db?)"),
    ({"rrc": {}, "gain": {}}, "augment.gain: waveform op 'gain' comes after log-mel op 'rrc'"),
    ({"gain": 3}, "augment.gain: expected a mapping"),
])
def test_bad_chains_name_the_key(section, message):
    with pytest.raises(ConfigError) as err:
        parse_chain(section)
    assert message in str(err.value)


def test_ir_folder_problems_name_the_folder_or_file(tmp_path):
    with pytest.raises(ConfigError, match="holds no audio file"):
        _aug({"rir": {"folder": str(tmp_path)}})
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(ConfigError, match="cannot read impulse response .*broken.wav"):
        _aug({"rir": {"folder": str(tmp_path)}})
    with pytest.raises(ConfigError, match="is not a folder"):
        _aug({"rir": {"folder": str(tmp_path / "nope")}})


def test_null_removes_an_entry_and_one_op_can_appear_twice():
    ops = parse_chain({"gain": None, "mask_a": {"op": "time_mask"}, "mask_b": {"op": "time_mask", "p": 0.5}})
    assert [(o.label, o.op) for o in ops] == [("mask_a", "time_mask"), ("mask_b", "time_mask")]


@pytest.mark.e2e
@pytest.mark.parametrize("override, message", [
    ('augment={"rrc": {"time_scale": [1.0, 0.5]}}', "augment.rrc.time_scale: the range [1.0, 0.5] is reversed"),
    ('augment={"gain": {"p": -0.1}}', "augment.gain.p: must be a probability in [0, 1]"),
    ('augment={"gain": {"views": [3]}}', "augment.gain.views: [3] names a view that does not exist"),
    ("augment.warp.p=0.5", "augment.warp: unknown op 'warp'"),
])
def test_pretrain_exits_2_naming_the_key_before_any_work(tiny_shards, tmp_path, override, message):
    import subprocess

    from tests.conftest import PYTHON, cli_env, tiny_overrides

    run_dir = tmp_path / "run"
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "pretrain", *tiny_overrides(tiny_shards, run_dir), override],
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not run_dir.exists()


@pytest.mark.e2e
def test_an_empty_ir_folder_exits_2_before_any_work(tiny_shards, tmp_path):
    import subprocess

    from tests.conftest import PYTHON, cli_env, tiny_overrides

    (tmp_path / "irs").mkdir()
    run_dir = tmp_path / "run"
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "pretrain", *tiny_overrides(tiny_shards, run_dir),
                          f'augment={{"rir": {{"folder": "{tmp_path / "irs"}"}}}}'],
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "holds no audio file" in out.stderr and "Traceback" not in out.stderr
    assert not (run_dir / "checkpoints").exists()
