"""Screens of the terminal app: main (layer table), detail, heatmap, alerts, help, picker."""
