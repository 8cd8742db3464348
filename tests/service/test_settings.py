"""Settings: those that repeat an engine default agree with it, and the start message says what is on and off."""

from __future__ import annotations

from service.settings import Settings


def test_the_servers_media_limits_default_to_the_engines():
    """The settings repeat the engine's media limits (the settings module imports no torch): they must agree."""
    from aim_engine.media import MediaLimits

    limits, settings = MediaLimits(), Settings(models=["a"])
    assert settings.max_media_bytes == limits.max_bytes
    for name in ("max_pixels", "max_frames", "max_decoded_bytes", "max_decoded_frames"):
        assert getattr(settings, name) == getattr(limits, name), name


def test_the_start_message_says_off_for_what_is_off(make_server, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="aim.service"):
        srv = make_server(metrics_port=-1)
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("listening on")]
    assert started and "metrics off" in started[0] and "HTTP API off" in started[0] and "None" not in started[0]
    assert srv.metrics_port is None
