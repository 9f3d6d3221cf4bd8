"""The tabs of the web UI, one module each (the three generation tabs share one); each lays
out its components inside the `gr.Tab` that `webui.app` opened, wires its events and keeps
its handlers callable without a browser."""
