"""Widgets of the dashboard main screen."""
