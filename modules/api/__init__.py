"""The HTTP API under A1111's paths (/sdapi/v1/*)."""
