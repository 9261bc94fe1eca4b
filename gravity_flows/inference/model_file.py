"""The amortized model as a file: its weights and everything that says what it may be applied to.

A model q(theta | d) is only valid for the survey it was trained on: the same stations (the summary
network's inputs are station values in order), the same noise sd per station (its inputs are in
units of sigma, and the simulations had that noise), the same prior box and the same density, known
or free with the same bounds (the posterior it learned is for that prior). So the file carries them,
with the script and flow options that rebuild the network and the library versions it was made
with, and :func:`check_applies` compares them with a profile before the model is used (STYLE lesson
13: sbi's saved posteriors broke across versions and devices because they did not, sbi issues 1254
and 982). Every refusal is one :class:`forward.DataError` line, raised before anything is written.

The file is ``torch.save`` of a dict of plain values and tensors, read back with
``torch.load(weights_only=True)`` (no pickled code is run on load).
"""

from pathlib import Path

import numpy as np
import torch

import forward

#: What a model file says it is, and the version of its layout.
MODEL_KIND = "gravity-flows amortized posterior"
MODEL_FORMAT = 1
#: Stations match when they differ by at most this fraction of the profile's length (a CSV written
#: with fewer digits than a double still matches), and sigma when within this relative difference.
STATION_TOLERANCE = 1e-6
NOISE_TOLERANCE = 1e-6
_KEYS = ("kind", "format", "method", "flow", "survey", "training", "versions", "state_dict")


def survey_record(survey):
    """The survey a model was trained for, as plain values: stations, sigma per station, box, density."""
    return {
        "parameters": list(survey.names),
        "stations": [float(x) for x in survey.stations],
        "noise_sd": [float(s) for s in survey.noise_sd_array],
        "bounds": survey.bounds.tolist(),
        "density": None if survey.free_density else float(survey.density),
        "density_bounds": None if not survey.free_density else [float(v) for v in survey.density_bounds],
    }


def survey_from_record(record):
    """The :class:`forward.Problem` (no data) of the survey a model file describes."""
    survey = record["survey"]
    bounds = np.array(survey["bounds"], dtype=float)
    parameters = forward.SPHERE_FREE_DENSITY if survey["density_bounds"] is not None else forward.SPHERE
    density = survey["density"] if survey["density"] is not None else float(np.mean(survey["density_bounds"]))
    stations = np.array(survey["stations"], dtype=float)
    return forward.Problem(stations=stations, g_obs=np.zeros(stations.size), noise_sd=np.array(survey["noise_sd"]),
                           density=density, bounds=bounds, parameters=parameters, source={"kind": "survey"})


def model_record(model, *, method, flow, survey, training, versions):
    """The dict a model file holds: ``method`` (the script's), ``flow`` (the options that rebuild it),
    ``survey`` (a :class:`forward.Problem` whose stations, sigma, box and density define the survey),
    ``training`` (what training did), ``versions`` (libraries) and the weights (on the CPU)."""
    return {
        "kind": MODEL_KIND,
        "format": MODEL_FORMAT,
        "method": method,
        "flow": dict(flow),
        "survey": survey_record(survey),
        "training": dict(training),
        "versions": {str(name): str(version) for name, version in versions.items()},  # plain str: torch's is a class
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }


def read_model(path):
    """The record of the model file ``path``; DataError (one line) if it is missing, not a model file or truncated."""
    path = Path(path)
    if not path.is_file():
        raise forward.DataError(f"model file not found: {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a zip, a truncated one, a pickle of something else: all the same to a user
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:100]
        raise forward.DataError(f"{path} is not a model file of gravity-flows, or it is truncated ({reason})") from None
    if not isinstance(record, dict) or record.get("kind") != MODEL_KIND:
        raise forward.DataError(f"{path} is not a model file of gravity-flows (made by --amortize)")
    if record.get("format") != MODEL_FORMAT or any(key not in record for key in _KEYS):
        raise forward.DataError(f"{path} is a model file of another layout (format {record.get('format')!r}, this "
                                f"version reads format {MODEL_FORMAT}): train it again with --amortize")
    return record


def _numbers(values):
    return ", ".join(f"{v:g}" for v in values)


def check_method(record, method, path):
    """DataError unless the model was made by the script ``method`` (e.g. ``"coupling_NSF"``)."""
    if record["method"] != method:
        raise forward.DataError(f"{path} is a model of Gravity_{record['method']}.py, not of Gravity_{method}.py: "
                                f"apply it with python Gravity_{record['method']}.py --model {path}")


def check_prior(record, bounds, density, density_bounds, path):
    """DataError unless the prior box and density setting (options ``--bounds``, ``--density``,
    ``--density-bounds``) are the model's: it learned the posterior of that prior only."""
    survey = record["survey"]
    model_bounds = np.array(survey["bounds"], dtype=float)
    if (density_bounds is None) != (survey["density_bounds"] is None):
        if density_bounds is None:
            raise forward.DataError(f"{path} was trained with the density unknown (--density-bounds "
                                    f"{_numbers(survey['density_bounds'])}); give the same --density-bounds")
        raise forward.DataError(f"{path} was trained with the density known (--density {survey['density']:g}); "
                                "drop --density-bounds")
    if density_bounds is not None and not np.array_equal(np.asarray(density_bounds, dtype=float),
                                                         np.asarray(survey["density_bounds"], dtype=float)):
        raise forward.DataError(f"--density-bounds {_numbers(density_bounds)} differ from the model's "
                                f"{_numbers(survey['density_bounds'])} ({path})")
    if density_bounds is None and float(density) != survey["density"]:
        raise forward.DataError(f"--density {density:g} differs from the model's {survey['density']:g} ({path})")
    sphere_bounds = np.asarray(bounds, dtype=float).reshape(-1)
    if not np.array_equal(sphere_bounds, model_bounds[:3].reshape(-1)):
        raise forward.DataError(f"--bounds {_numbers(sphere_bounds)} differ from the model's prior box "
                                f"{_numbers(model_bounds[:3].reshape(-1))} ({path})")


def check_profile(record, problem, path, name):
    """DataError unless the profile ``problem`` (from the file ``name``) has the model's stations and sigma."""
    survey = record["survey"]
    stations = np.array(survey["stations"], dtype=float)
    if problem.n_stations != stations.size:
        raise forward.DataError(f"{name} has {problem.n_stations} stations, the model {path} was trained on "
                                f"{stations.size}: a model applies to profiles of its own survey only")
    length = max(float(np.ptp(stations)), 1e-300)
    offset = np.abs(problem.stations - stations)
    if np.any(offset > STATION_TOLERANCE * length):
        k = int(np.argmax(offset))
        raise forward.DataError(f"{name}: station {k + 1} lies at x = {problem.stations[k]:g} m, the model {path} "
                                f"has it at {stations[k]:g} m: a model applies to profiles of its own survey only")
    noise_sd = np.array(survey["noise_sd"], dtype=float)
    relative = np.abs(problem.noise_sd_array / noise_sd - 1.0)
    if np.any(relative > NOISE_TOLERANCE):
        k = int(np.argmax(relative))
        raise forward.DataError(f"{name}: the noise sd at station {k + 1} is {problem.noise_sd_array[k]:g} µGal, the "
                                f"model {path} was trained with {noise_sd[k]:g} µGal (the sigma column, or --noise)")
