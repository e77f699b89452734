//! Configuration: sensor.yaml (operations) and conduits.yaml (network team).
