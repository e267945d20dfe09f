"""The service's routes, one module per resource: jobs, their images (Deep Zoom), the page."""
