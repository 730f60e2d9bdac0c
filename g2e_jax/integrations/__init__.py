"""Adapters to third-party evaluation harnesses (optional extras; each module imports its harness)."""
