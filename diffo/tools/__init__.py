"""Measuring tools, apart from the codec: benchmarks, evaluation against classical codecs, reliability matrices,
fuzzing, sweeps, metrics and figures. They use the library's public API only."""
