"""Confidence levels shared by evaluation, plots, truth and the sweep comparison."""

CL68 = 0.6826894921370859  # one Gaussian sigma
CL95 = 0.9544997361036416  # two Gaussian sigma
CL68_P_VALUE = 1.0 - CL68  # a grid point with a larger p-value lies inside the 68 % CL region
CL95_P_VALUE = 1.0 - CL95
