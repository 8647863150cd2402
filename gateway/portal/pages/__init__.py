"""The portal's pages, one module per area; each registers its routes on gateway.portal.web.bp."""
