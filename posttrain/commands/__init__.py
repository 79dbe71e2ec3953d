"""The `posttrain` command groups; :mod:`posttrain.cli` assembles them. :mod:`~posttrain.commands.common` holds what they share."""
