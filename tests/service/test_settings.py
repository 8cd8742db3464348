"""Settings that repeat an engine default agree with it."""

from __future__ import annotations

from service.settings import Settings


def test_the_servers_media_limits_default_to_the_engines():
    """The settings repeat the engine's media limits (the settings module imports no torch): they must agree."""
    from aim_engine.media import MediaLimits

    limits, settings = MediaLimits(), Settings(models=["a"])
    assert settings.max_media_bytes == limits.max_bytes
    for name in ("max_pixels", "max_frames", "max_decoded_bytes", "max_decoded_frames"):
        assert getattr(settings, name) == getattr(limits, name), name
