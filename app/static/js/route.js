/* The view on screen ({view, id}), set by main.js's router: a view's late answers check it so they
 * never draw over another view. */

export const route = { view: null, id: null };

export function setRoute(next) { route.view = next.view; route.id = next.id || null; }
