"""Test and demo scaffolding: what the tests, benchmarks and the quickstart need, kept out of
the runtime and calibration modules (as ``transformers.testing_utils`` is).

- :mod:`.tiny`: tiny random-weight VLMs with planted modality-specific outliers, synthetic
  samples, fidelity metrics;
- :mod:`.families`: a tiny model of every supported family with offline processors;
- :mod:`.sites`: random :class:`~splitq_modifier.runtime.SiteParams`.

Nothing in the package outside this subpackage imports it.
"""
