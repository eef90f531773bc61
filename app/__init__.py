"""The application on top: the `deltaedit` command line and the demo. Imports point down only: app → flows → tasks → models / infra."""
