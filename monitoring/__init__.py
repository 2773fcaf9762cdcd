"""Monitoring of live traffic: drift and bias reports, and the retraining decision."""
