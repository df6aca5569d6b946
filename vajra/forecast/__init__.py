"""Learned arrival forecasts (torch, CPU): predictors too heavy for the pure policies package.

:class:`LstmPredictor` implements the same :class:`~vajra.policies.predictors.ArrivalPredictor`
interface as the pure predictors, so the prefetcher, the predictor actor and the simulator
use it unchanged.
"""

from vajra.forecast.lstm import LstmPredictor

__all__ = ["LstmPredictor"]
