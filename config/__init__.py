"""Settings for every mlx-ring process."""

from config.settings import REPO_DIR, Settings, SettingsError, load_settings, settings_or_exit

__all__ = ["REPO_DIR", "Settings", "SettingsError", "load_settings", "settings_or_exit"]
